"""HTTP APIs (Klein): map requests to calls on volumes and back."""
