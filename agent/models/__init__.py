"""Model manifest, verification (sha256 + signature before any session), routing, sessions."""
