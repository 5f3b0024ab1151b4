"""The web console: finance, compliance and operators in a browser (issue #20).

A client of the Scheduler/Admin gRPC API, not a second backend: every page and action calls the
scheduler with a client certificate for the signed-in person and their role, so RoleGate decides
what they may see and do, and the Admin service audits every act with their name.
"""
