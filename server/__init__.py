"""The family-doctor IM server: application, configuration, lifecycle and shared services."""

__version__ = "0.1.0"
