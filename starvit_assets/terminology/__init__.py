"""FHIR terminology: the embedded local service, the remote client, the local server."""
