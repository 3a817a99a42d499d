# Sourced by bench/run.sh and bench/instructions.sh: the nginx reverse proxy
# both measure, written once.
#
#   nginx_proxy_conf FILE WORK LISTEN_PORT UPSTREAM_PORT [top-level directives] [log]
#
# One worker, upstream keep-alive, the bearer set, streaming like
# dataverse-proxy (`proxy_buffering off`: with buffering on it would spool
# 1 GiB to disk); scratch paths under WORK. No access log, or with `log`
# a JSON access line much like dataverse-proxy's, buffered as an operator
# would set it (`buffer=64k flush=1s`) into WORK/logs.
nginx_proxy_conf() {
  local file=$1 work=$2 listen=$3 upstream=$4 extra=${5:-} log=${6:-}
  local access="access_log off;"
  if [ "$log" = log ]; then
    access="log_format line escape=json '{\"timestamp\":\"\$time_iso8601\",\"request.id\":\"\$request_id\",'
      '\"method\":\"\$request_method\",\"path\":\"\$uri\",\"status\":\$status,'
      '\"bytes_in\":\$request_length,\"bytes_out\":\$body_bytes_sent,\"duration\":\$request_time,'
      '\"upstream\":\"\$upstream_header_time\",\"dataverse_request_id\":\"\$upstream_http_x_ms_service_request_id\"}';
  access_log $work/logs/$(basename "$file" .conf)-access.log line buffer=64k flush=1s;"
  fi
  cat > "$file" <<CONF
worker_processes 1;
$extra
daemon off;
pid $file.pid;
error_log $work/logs/$(basename "$file" .conf)-error.log warn;
events { worker_connections 4096; }
http {
  $access
  client_body_temp_path $work/tmp; proxy_temp_path $work/tmp; fastcgi_temp_path $work/tmp;
  uwsgi_temp_path $work/tmp; scgi_temp_path $work/tmp;
  keepalive_requests 1000000;
  upstream dataverse { server 127.0.0.1:$upstream; keepalive 64; }
  server {
    listen 127.0.0.1:$listen backlog=4096;
    location / {
      proxy_pass http://dataverse;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer bench-token";
      proxy_buffering off;
      proxy_request_buffering off;
    }
  }
}
CONF
}
