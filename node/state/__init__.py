"""The node's durable state: checkpoints of the applied rounds, the layout file and initial-model
fingerprint the operator pins, and bootstrapping from another member's export."""
