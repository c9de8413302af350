"""Examples: code locations and functions built on the public API only, as a user's project is."""
