"""The record format: struct event as Python sees it. Imports nothing of ours."""
