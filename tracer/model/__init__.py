"""The model: pure Python, rebuilt from decoded events (live or recorded)."""
