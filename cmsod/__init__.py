"""cmsod: change-management schedule optimizer daemon."""

__version__ = "0.1.0"
