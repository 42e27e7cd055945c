"""The GPU performance model for machines without a GPU: interpreter IO/FLOP counts and a roofline."""
