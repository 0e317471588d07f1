"""The canonical model: the one shape every business milestone takes between rules and targets."""
