"""Tables, plots and summaries of finished runs."""
