"""What every member of a federation must agree on: the update's layout and the server-side
optimizer settings."""
