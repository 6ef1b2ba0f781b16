"""The node's privacy ledger, its per-round plans and reservations, and its one-off DP releases."""
