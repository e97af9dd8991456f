"""imgrec studio: make classes, add photos (files or webcam), train in the background on cached
EfficientNet-Lite features, test and export, from a local web page or its JSON API under
/v1/studio/. A project is an ordinary folder dataset, DIR/<project>/data/<class>/<file>.

The pieces: store (projects, classes and images on disk), trainer (one background training
per project, the model renamed into place when done), routes and schemas (the API), app (the
FastAPI app and `imgrec studio`'s server), static/ (the page). Torch is imported only by the
trainer, when a training starts.
"""
