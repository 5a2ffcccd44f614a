"""Configuration models (manager, user endpoint) and admin template rendering."""
