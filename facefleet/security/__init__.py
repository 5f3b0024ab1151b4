"""Security and compliance: mTLS material, identities and roles, audit chain, data residency.

Roles travel in the client certificate as SAN URIs `urn:facefleet:role:<role>`; the identity is
the certificate's CN. See docs/security.md for the threat model.
"""
