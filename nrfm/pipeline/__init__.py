"""The run: workspace and run layout, stage graph, runner, provenance and the HTML report."""
