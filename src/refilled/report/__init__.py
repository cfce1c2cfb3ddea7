"""Reports: summary.json files to tables, figures, claims, gain vs data, reproduction, the supplement's numbers. Torch-free."""
