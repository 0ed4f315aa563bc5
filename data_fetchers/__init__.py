"""Dataset fetchers (DiSCo, Tractometer) for esdmri."""
