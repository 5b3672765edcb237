"""Who may pull what: pull policies and client authentication."""
