//! HTTP/1.x request stream parser (sans-IO). (to be written)
