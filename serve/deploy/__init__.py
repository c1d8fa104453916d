"""Scale-out: the same app as a Ray Serve deployment, one replica per GPU."""
