"""One router per resource, mounted under /api by backend.main."""
