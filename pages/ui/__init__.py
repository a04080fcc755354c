"""Helpers of the Streamlit pages, one module per concern (no algorithm here: everything computed
comes from ``explainer`` / ``data_index``):

``access``    who may see what (navigation, lead key, participant sessions)
``errors``    user errors as messages, never a traceback (:func:`errors.guard`)
``state``     view state in the URL
``progress``  the one progress bar for every long job
``resources`` models, catalogs, computed results and the current workspace (one cache rule)
``pictures``  crops, images, boxes and heatmap overlays as arrays
``widgets``   class pickers and the method's settings
``views``     shared renderers (prediction test verdict, concept crops, heatmaps, run-or-load)
``trust``     the user's own model code runs only after this browser session confirmed it
``synthesis`` concepts synthesised by optimisation beside their nearest crops, on demand
``runs``      keep each result in the run history, export buttons, two runs side by side
``heatmaps``  concept heatmaps with a colour scale, opacity, a concept chosen, a larger view
"""
