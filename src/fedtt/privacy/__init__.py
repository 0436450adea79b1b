"""Privacy components: secure aggregation."""
