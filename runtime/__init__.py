"""Device server (Open Inference Protocol over gRPC), aggregator, bundle manifest. Imports without torch."""
