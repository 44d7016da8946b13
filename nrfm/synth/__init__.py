"""The synthetic multi-site glioma cohort: anatomy, markers, sites, scenarios and the oracle."""
