"""The contract between serving and trainer: vote and comparison schemas, Redis layout, Kafka topics."""
