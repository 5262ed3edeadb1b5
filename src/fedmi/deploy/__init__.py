"""Deployment across machines on Flower's deployment runtime: certificates, the server
(SuperLink), the sites (SuperNodes), submitting runs. The federated logic itself lives in
`fedmi.runtime.flower`, shared with Flower's simulation runtime."""
