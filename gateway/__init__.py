"""The replicate concurrent generation gateway: the service and its command line `rcg`."""
