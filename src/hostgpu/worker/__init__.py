"""The native worker: leases jobs from the gateway and runs them in long-lived child processes."""
