"""The commands and their text views: the top layer, imported by nothing."""
