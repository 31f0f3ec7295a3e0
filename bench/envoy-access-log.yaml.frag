# Spliced into envoy.yaml.tmpl for the row with an access log (peers.py): the fields of the
# gateway's access log line that Envoy knows, as one JSON object per line on stdout. Envoy
# writes them through a buffer of its own, flushed by a thread of its own.
                access_log:
                  - name: envoy.access_loggers.stdout
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
                      log_format:
                        json_format:
                          time: "%START_TIME%"
                          request_id: "%REQ(X-REQUEST-ID)%"
                          method: "%REQ(:METHOD)%"
                          path: "%REQ(:PATH)%"
                          status: "%RESPONSE_CODE%"
                          flags: "%RESPONSE_FLAGS%"
                          route: "%ROUTE_NAME%"
                          duration_ms: "%DURATION%"
                          upstream_ms: "%RESPONSE_DURATION%"
                          bytes_sent: "%BYTES_SENT%"
