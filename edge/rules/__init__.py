"""Machine rules: from signals and MES order events to the milestones ERP and QMS can use."""
