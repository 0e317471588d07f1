"""`plantsync`: the command line of the gateway and of the technician."""
