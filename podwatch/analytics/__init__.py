"""polars features, streaming checks, thermal-risk models, headroom forecasts, the capacity
planner, alert rules and routing."""
