"""The node runtime: the Flower ClientApp (plain and secure aggregation), the SuperNode launcher and its
task gate, the node's own configuration and keys, and the site's data."""
