//! Virtual appliances for streaming (issue 5). Work in progress.
