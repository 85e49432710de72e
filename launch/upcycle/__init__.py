"""`moeflow upcycle`: the command line (`cli`), its sources, its outputs and the run that joins them."""
