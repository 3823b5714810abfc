"""Device profiles, placement planner, local fleet launcher, simulation and reports. Imports without torch."""
