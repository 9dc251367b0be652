"""Locate: co-activation graphs -> modules -> scores against random controls -> clusterability."""
