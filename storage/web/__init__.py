"""twisted.web plumbing: the Site, streaming upload bodies, producers."""
