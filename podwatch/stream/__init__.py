"""The Kafka contract: envelopes, topics, the idempotent spooling producer, the consumer,
dead letters, and the embedded local broker (Tansu) for development."""
