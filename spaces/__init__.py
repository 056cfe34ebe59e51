"""What can be searched: configs, blocks, the builder, analytic estimates and sampling."""
