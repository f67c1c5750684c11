"""The node's two streams: the encrypted update up (SubmitUpdate), the encrypted sum down
(FetchAggregate, resumable)."""
