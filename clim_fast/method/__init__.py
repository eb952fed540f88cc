"""The method: encoders, the MoCo queue, shuffle BN, the CLIM loss and the mixing op."""
