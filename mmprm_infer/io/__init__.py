"""Files in and out, for the commands and the library alike: input records read in windows (``records``),
outputs written atomically (``files``), progress bars and stage lines (``progress``)."""
