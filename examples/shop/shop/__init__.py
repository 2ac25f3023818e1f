"""The reference shop: every atoll capability, exercised by a small store."""
