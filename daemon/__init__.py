"""gnpd: the streaming continual-learning daemon (Kafka -> Arrow chunks -> grow-and-prune -> serving)."""
