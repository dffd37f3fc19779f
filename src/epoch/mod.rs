//! Epoch store (being written).
