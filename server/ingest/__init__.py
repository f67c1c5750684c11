"""Uploads in: validate each chunk of a SubmitUpdate stream, spool it, and add it into the
round's running sum (all or nothing), on every core for a masked round."""
