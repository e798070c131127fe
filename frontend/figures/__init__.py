"""Plotly figures, one module per analysis: functions ``result -> go.Figure``.

They take the analysis' result JSON only, so the app and the HTML report draw the same
pictures.
"""
