"""facefleet test suite (a package so tests.fixtures imports from anywhere)."""
